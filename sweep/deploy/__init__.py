"""Deploying a study's pick: ``sweep export`` (refit, check, write an artefact folder) and
``sweep predict`` (score images with the artefact alone). ``docs/deploy.md``."""
