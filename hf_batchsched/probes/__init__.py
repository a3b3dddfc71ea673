"""hf_batchsched.probes"""
