"""The runnable pipelines, installed as ``fewshot_med.pipelines`` (the folder stays at the top of the
repository): each composes the library's stages from a validated config."""
