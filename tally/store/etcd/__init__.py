"""etcd v3 as the regions' witness quorum (``Witness``), over etcd's own JSON gateway."""
