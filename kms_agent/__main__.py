"""python -m kms_agent"""

import sys

from kms_agent.cli import main

sys.exit(main())
