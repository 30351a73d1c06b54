"""The digits wing: scikit-learn's handwritten digits as an ImageFolder, and a classifier that judges samples.

`digits.data` exports the dataset, `digits.judge` trains and loads the classifier, `digits.scores` defines the
scores, and `digits.metric.DigitsJudge` runs them as the evaluation metric ``--metrics digits``.
"""
