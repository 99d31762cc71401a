import gc
import os

import torch

# pytest-xdist runs one worker per core: one thread each avoids oversubscribing the CPU
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``make mutation`` runs each module's mutants against its own test files only (MUTATION_TEST_FILES, comma
    separated): a mutant that survives runs every test that calls the code it changed, which must stay short."""
    selected = os.environ.get("MUTATION_TEST_FILES")
    if not selected:
        return
    keep = set(selected.split(","))
    deselected = [item for item in items if item.path.name not in keep]
    items[:] = [item for item in items if item.path.name in keep]
    config.hook.pytest_deselected(items=deselected)


def pytest_unconfigure(config):
    """Under ``make mutation``, mutmut's fork server runs one collection and then forks a child per mutant. Freezing
    the objects alive at that point (torch, diffusers, the test modules) keeps each child's garbage collections from
    walking, and so copying, the parent's whole heap: about 1.2 s less per mutant here."""
    if os.environ.get("MUTATION_TEST_FILES"):
        gc.freeze()
