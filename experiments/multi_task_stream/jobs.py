"""The jobs of the two-task stream experiment: the shop's two-head job
(click, and a purchase that exists only after a click) and one single-task
job per head, each learning its head alone from the same examples topic.
The world and the model are the tests' shop job's (`tests/jobs/shop_tasks.py`).
"""

from tests.jobs.shop_tasks import HEADS, make_job, make_log  # noqa: F401

job = make_job()
click_only = make_job(heads=(HEADS[0],), name="click_only")
buy_only = make_job(heads=(HEADS[1],), name="buy_only")
