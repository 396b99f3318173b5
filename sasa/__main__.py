import sys

from sasa.cli import main

sys.exit(main())
