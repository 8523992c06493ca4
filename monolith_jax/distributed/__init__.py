"""Scale-out: training PS shards and their client, data-parallel trainers
and the asynchronous dense master, the launcher.

  training_ps    one shard of every table per process; ShardedTable, the client
  data_parallel  DataParallel: several trainers, one all-reduced dense step
  dense_ps       the asynchronous option: dense deltas through a master copy
  cluster        the launcher: N shards and M trainers from one job file
"""
