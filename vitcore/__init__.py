"""vitcore: what every stage shares."""

from importlib.metadata import packages_distributions

# The name this code is distributed under (pyproject's), for what it publishes: the model card's Hub
# tag, the W&B project. Read from the installed metadata, so the core names no stage; "vitcore" when
# the code runs uninstalled from a checkout.
PROJECT: str = packages_distributions().get("vitcore", ["vitcore"])[0]
