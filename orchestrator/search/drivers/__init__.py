"""The search drivers, one module each (shapley, evolution, tune); registered in
:mod:`orchestrator.search.registry`. Each proposes profiles through the charged evaluator pool of its
:class:`~orchestrator.search.drivers.context.DriverContext` and returns its best."""
