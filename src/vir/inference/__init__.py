"""Inference on trained models: batched greedy generation and exact-match evaluation."""
