"""Request signers: pure functions of the request's parts, tested with vendor vectors."""
