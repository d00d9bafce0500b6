"""`python -m vitpool.cli`: the processes `finetune --nproc-per-node` starts."""

from vitpool.cli import main

main()
