"""Research: the seed study's reproduction and the hyper-parameter search on shared Optuna
storage. Imports: basics, images, datasets, inference, training, evaluation, reporting."""
