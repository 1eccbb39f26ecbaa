"""The lecture's published numbers ("Building makemore Part 3", makemore_part3_bn.ipynb,
printed outputs), which plumb reproduces. Stage names follow plumb's presets."""

#: Final (train, val) losses of the loss-log table, per stage of the single-layer MLP.
LOSS_LOG: dict[str, tuple[float, float]] = {
    "original": (2.1245384216308594, 2.168196439743042),
    "fix-softmax": (2.07, 2.13),  # printed to 2 decimals in the notebook
    "fix-tanh": (2.0355966091156006, 2.1026785373687744),
    "kaiming": (2.0376641750335693, 2.106989622116089),
    "batchnorm": (2.0668270587921143, 2.104844808578491),  # running stats calibrated on train
}

#: The batchnorm stage: loss printed every 10,000 steps, and eval with running statistics.
BATCHNORM_PRINTED = (
    3.3239,
    2.0322,
    2.5675,
    2.0125,
    2.2446,
    1.8897,
    2.0785,
    2.3681,
    2.2918,
    2.0238,
    2.3673,
    2.3132,
    1.6414,
    1.9311,
    2.2231,
    2.0027,
    2.0997,
    2.4949,
    2.0199,
    2.1707,
)
BATCHNORM_RUNNING = (2.0674145221710205, 2.1056840419769287)
BATCHNORM_PARAMETERS = 12097

#: lecture-deep after 1,001 steps (steps 0..1000), evaluated in eval mode.
DEEP_STEP0_LOSS = 3.287
DEEP_1001 = (2.4002976417541504, 2.3982467651367188)
DEEP_PARAMETERS = 47024
