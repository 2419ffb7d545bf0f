"""Installed by tests/test_gpu_check.py from a wheel, as gpu_check.sh installs carried wheels."""
