"""Key-provider backends. Each one maps a kind of key store onto KeyProvider/KeyHandle."""
