"""cnnjax: write a convolutional network, see its geometry, train it, compare it."""
