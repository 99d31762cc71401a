"""Entry point for diffusers' generic loader:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=diffusers_scorekit.CUSTOM_PIPELINE, trust_remote_code=True)

diffusers treats any custom pipeline file as remote code, hence ``trust_remote_code``: this one is the installed
package's own. diffusers copies the file into its modules cache and imports it, so it uses absolute imports only.
``ScoreSDEPipeline.from_pretrained(folder)`` needs none of this.
"""

from diffusers_scorekit import ScoreSDEPipeline  # noqa: F401
