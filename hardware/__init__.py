"""Virtual and emulated devices for tests and demos; real-device notes live in docs."""
