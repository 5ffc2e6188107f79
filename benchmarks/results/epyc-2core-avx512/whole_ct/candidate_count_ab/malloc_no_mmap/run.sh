#!/bin/bash
# the 5-part INT8 row through PTQLogic.pipeline.segment in one process (faults.py: page faults and CPU at progress
# events), code at a89d275, default glibc malloc, then with every block from the heap and freed memory kept;
# the committed logs are these with the library warning lines filtered out (grep -v -i warn)
PYTHONPATH=/work/main python faults.py > default.log 2>&1
PYTHONPATH=/work/main MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=268435456 \
  /usr/bin/time -v python faults.py > no_mmap.log 2>&1
