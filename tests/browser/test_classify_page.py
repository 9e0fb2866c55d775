"""The Multilingual classification tab in Chromium: an example classified, scores and chart drawn,
a refused request leaving the tab usable."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

LABELS = ["体育", "经济", "科技", "娱乐"]


@pytest.fixture()
def tab(page):
    page.get_by_role("tab", name="Multilingual classification").click()
    return page


def test_an_example_is_classified_with_scores_and_chart(tab):
    tab.get_by_text("国家队昨晚在决赛中以二比一战胜对手，夺得冠军。").click()
    expect(tab.get_by_label("Hypothesis template ({} = the label)")).to_have_value("这个例子是关于{}的。")
    tab.get_by_role("button", name="Classify").click()
    scores = tab.get_by_test_id("label")
    for label in LABELS:
        expect(scores.get_by_test_id(f"{label}-confidence-set")).to_be_visible(timeout=30_000)
    percents = [int(p) for p in re.findall(r"(\d+)%", scores.inner_text())]
    assert len(percents) == len(LABELS) and 97 <= sum(percents) <= 103  # single-label: one distribution
    chart = tab.locator(".vega-embed")
    expect(chart).to_be_visible()
    expect(chart.get_by_text("科技", exact=True)).to_have_count(1)  # the bars are labelled in the chart
    assert tab.console_errors == []


def test_a_refused_request_leaves_the_tab_usable(tab):
    tab.get_by_label("Text (any language)").fill("El gobierno aprobó una nueva ley de educación.")
    tab.get_by_label("Labels (comma separated, any language)").fill(" , ")
    tab.get_by_role("button", name="Classify").click()
    expect(tab.get_by_test_id("toast-body").filter(has_text="at least one label")).to_be_visible()
    tab.get_by_label("Labels (comma separated, any language)").fill("política, deportes, política")
    tab.get_by_role("button", name="Classify").click()
    expect(tab.get_by_test_id("deportes-confidence-set")).to_be_visible(timeout=30_000)
    expect(tab.get_by_text("Duplicate labels merged: política.")).to_be_visible()
