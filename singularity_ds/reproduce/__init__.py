"""``singularity-ds reproduce``: where a paper row's released checkpoint and data are (:mod:`.locate`),
and its evaluation with the verdict (:mod:`.run`); the rows themselves: :mod:`singularity_ds.paper`."""
