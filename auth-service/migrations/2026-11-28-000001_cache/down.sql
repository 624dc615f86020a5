DROP TABLE sessions;
DROP TABLE cached_users;
