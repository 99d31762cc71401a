"""Make diffusers' generic loader know this package.

diffusers has no registry for third-party pipelines or component libraries: ``DiffusionPipeline.from_pretrained``
looks the pipeline class up as a name on the ``diffusers`` module, and ``DiffusionPipeline.download`` refuses a
repo whose ``model_index.json`` names a library it does not list in ``LOADABLE_CLASSES`` (it then expects a
``<component>/<library>.py`` file of remote code). Importing ``diffusers_scorekit`` registers both, so that
``DiffusionPipeline.from_pretrained(folder_or_repo)`` loads a ``ScoreSDEPipeline`` with no ``custom_pipeline`` and no
``trust_remote_code``: nothing is downloaded as code, the classes come from this installed package.
"""

LIBRARY = "diffusers_scorekit"


def register_with_diffusers(pipeline_class) -> None:
    import diffusers
    from diffusers.pipelines import pipeline_loading_utils

    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(
        LIBRARY,
        {"ModelMixin": ["save_pretrained", "from_pretrained"], "SchedulerMixin": ["save_pretrained", "from_pretrained"]},
    )
    if not hasattr(diffusers, pipeline_class.__name__):
        setattr(diffusers, pipeline_class.__name__, pipeline_class)
