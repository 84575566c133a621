import sys

from genfoundry.cli import main

sys.exit(main())
