"""hf_batchsched.callbacks"""
