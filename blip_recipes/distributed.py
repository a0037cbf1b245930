"""Object exchange between processes that is a no-op in a single process (no process group needed)."""


def broadcast_from_main(value, world_size: int):
    """Process 0's value, on every process."""
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_all(value, world_size: int) -> list:
    """Every process's value, in rank order, on every process."""
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_initialized():
        return [value]
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values
