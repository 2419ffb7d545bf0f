import sys

from r1pipeline.cli import main

sys.exit(main())
