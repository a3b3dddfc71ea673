"""hf_batchsched.data"""
