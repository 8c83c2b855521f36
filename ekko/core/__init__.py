"""The data model every layer shares: specs, versions and knowledge, deltas, the wire
codec, configuration, the table store, publish chains and the keyring.

Nothing here knows about the network, the replica node, the server or the SDK; every
other layer may import from here.
"""
