"""``python -m mmtrain``: what ``accelerate launch -m mmtrain`` and ``torchrun -m mmtrain`` run."""

import sys

from mmtrain.cli import main

sys.exit(main())
