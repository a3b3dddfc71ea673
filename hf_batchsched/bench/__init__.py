"""hf_batchsched.bench"""
