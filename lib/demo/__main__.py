"""`python -m lib.demo --config ...`: write the synthetic FathomNet-format dataset."""
import sys

from lib.demo.generate import main

sys.exit(main())
