"""What a training or serving job imports: the publisher, module tracking, trainer-side
rollback state, and the read client.  The public names are re-exported from :mod:`ekko`.
"""
