"""netacct-report's engine: merge node rows into jobs, select, aggregate, price, render."""
