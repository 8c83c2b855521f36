import os
import sys

# Test helpers (cluster builders) live beside the tests that use them.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "p2p"))
