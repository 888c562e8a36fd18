"""``python -m pipeline.data.corpora text8-normalise IN OUT``."""
import sys

from pipeline.data.corpora import main

sys.exit(main())
