"""Training the registration networks: settings, data, augmentation, objective, loop and the ``train`` commands."""
