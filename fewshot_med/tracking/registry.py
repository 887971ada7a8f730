"""The MLflow model registry: every adapted classifier becomes a version; an alias marks the best."""

from __future__ import annotations

from dataclasses import dataclass

from fewshot_med.tracking import names


@dataclass(frozen=True)
class Registration:
    """Where a model landed in the registry.

    Attributes:
        name: registered model name.
        version: the new version's number.
        alias: the alias of the rule (e.g. ``champion``).
        holds_alias: whether the alias now points at the new version.
    """

    name: str
    version: str
    alias: str
    holds_alias: bool


def register_model(
    model_uri: str, name: str, description: str, score: float, score_name: str, alias: str = "champion"
) -> Registration:
    """Register ``model_uri`` as a new version of ``name``, with ``description`` and its score.

    The alias rule: ``alias`` moves to the new version when no version holds it yet, or when the new
    version's ``score`` is at least the current holder's (scores of the same ``score_name``; a holder
    scored under another name is replaced). The registered model's description is then the alias
    holder's, so the registry page shows the evaluation summary of the model in use.

    Args:
        model_uri: a logged model (``models:/…`` or ``runs:/…``).
        name: registered model name (created if new).
        description: the version's description (markdown: its evaluation summary).
        score: the selection score of the new version (higher is better).
        score_name: what the score is, e.g. ``val.5shot.accuracy`` (``names.val_metric``).
        alias: the alias the rule moves.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    tags = {names.SCORE_TAG: str(score), names.SCORE_NAME_TAG: score_name}
    version = mlflow.register_model(model_uri, name, tags=tags)
    client.update_model_version(name, version.version, description=description)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        holder = None
    takes_alias = (
        holder is None
        or holder.tags.get(names.SCORE_NAME_TAG) != score_name
        or score >= float(holder.tags.get(names.SCORE_TAG, "-inf"))
    )
    if takes_alias:
        client.set_registered_model_alias(name, alias, version.version)
        client.update_registered_model(name, description=description)
    return Registration(name, str(version.version), alias, takes_alias)
