"""`python -m lib.report --config ...`: print the run's scores."""
import sys

from lib.report.summary import main

sys.exit(main())
