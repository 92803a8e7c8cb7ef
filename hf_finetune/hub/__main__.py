import sys

from hf_finetune.hub.cli import main

sys.exit(main())
