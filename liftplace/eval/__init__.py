"""Tools around the loss for judging distilled models: the digits classifier and its
Fréchet distance, teacher agreement (``metrics``), plots (``plots``) and the demo that
distils and compares students (``demo``, ``liftplace demo``). Needs the ``[train]`` extra."""
