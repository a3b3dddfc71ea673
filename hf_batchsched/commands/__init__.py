"""Subcommands of the ``hf-batchsched`` command, one module each (see ``hf_batchsched.cli``)."""
