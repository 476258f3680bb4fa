"""`ray job submit --working-dir . -- python ray_jobs/lora.py --config RECIPE.yaml [--set key=value ...]`

Joins the job's Ray cluster (a local one when run outside a cluster) and runs `prunekit lora`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir's prunekit comes first

from prunekit.cli import entry

entry(["lora", *sys.argv[1:]])
