#!/bin/bash
# one run: old (d5ab89b, /tmp/old_pkg) and new alternated process by process, 6 rounds; fastest of each
for i in 1 2 3 4 5 6; do
  for v in old new; do python /tmp/ab_adam.py $v 1; python /tmp/ab_sgd.py $v; done
done
