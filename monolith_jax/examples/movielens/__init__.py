"""The MovieLens-1M example job: its data loader (`data`), its job (`job`:
features, one table, DeepFM), its replay of the ratings as requests and
actions (`replay`) and the main job (`loop`: replay -> join -> train)."""
