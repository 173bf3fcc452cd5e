"""The allocators: ShapLoRA (:mod:`.shaplora`), AdaLoRA (:mod:`.adalora`, on the sensitivity tracker of
:mod:`.sensitivity`) and AlphaLoRA (:mod:`.alphalora`), each with its baselines."""
