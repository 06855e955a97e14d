"""A child that reads its stdin at about 6 MB/s (the benchmark's slow child)."""

import os
import time

while data := os.read(0, 65536):
    time.sleep(len(data) / 6e6)
