"""Every Gram-space aggregator of the package, for the tests that check all of them."""

import inspect

import nequip_mtl.aggregators as aggregators

#: the concrete GramAggregator classes exported by nequip_mtl.aggregators, in __all__ order
GRAM_AGGREGATORS = [
    cls
    for cls in (getattr(aggregators, name) for name in aggregators.__all__)
    if inspect.isclass(cls)
    and issubclass(cls, aggregators.GramAggregator)
    and cls is not aggregators.GramAggregator
]
