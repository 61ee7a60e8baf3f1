"""The ``transformers`` and PEFT layer: what plugs the op into a model.

- :mod:`~fastprompt.hf.compat`: every name and behaviour that differs between supported transformers / PEFT
  releases (the next rename is a change there only);
- :mod:`~fastprompt.hf.checkpoints`: checkpoints of a training PEFT model that keep its prompt encoders;
- :mod:`~fastprompt.hf.attention`: the ``"fastprompt"`` attention and mask functions registered with
  transformers, and :class:`~fastprompt.hf.attention.PrefixCache`;
- :mod:`~fastprompt.hf.patching`: ``patch`` / ``unpatch``; a patched PEFT model runs its prompt-learning
  forward and ``generate`` itself;
- :mod:`~fastprompt.hf.state`: the record a patch leaves on a model (what to restore, what lives as long as it);
- :mod:`~fastprompt.hf.registry`: the adapter registry of a patched model (one name per batch row), through
  which every prefix the patched forward runs is found;
- :mod:`~fastprompt.hf.soft_prompts`: a prompt's per-layer K/V from one run of the frozen model;
- :mod:`~fastprompt.hf.templates`: P-tuning with prompts anywhere in the input;
- :mod:`~fastprompt.hf.distributed`: FSDP sharding and saving of patched prompt models.
"""
