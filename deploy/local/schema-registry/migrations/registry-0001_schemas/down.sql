DROP TABLE registry_config;
DROP TABLE registry_subject_versions;
DROP TABLE registry_schemas;
