"""The backup flow: keyspace notifications to the change stream (the bridge), and change
entries to storage (the uploaders), with the leases, the index walk and the dead letters that
keep it exact."""
