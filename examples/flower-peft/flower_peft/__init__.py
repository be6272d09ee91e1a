"""flower-peft: a FlowerTune-shaped Flower app with a flexlora strategy (examples/flower-peft)."""
